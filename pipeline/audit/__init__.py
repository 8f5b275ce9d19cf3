"""The measuring half: fixtures, recorder, scenarios and report. Imports ``pipeline``; never the reverse."""
