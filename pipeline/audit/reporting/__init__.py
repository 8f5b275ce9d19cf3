"""Tables, charts, SLAs, the outbox and regression verdicts: read what the scenarios recorded, measure nothing."""
