"""One module per audit notebook, named after it, holding all of that notebook's measuring code.

The map from notebook to module is in ``pipeline.audit``'s docstring.
"""
