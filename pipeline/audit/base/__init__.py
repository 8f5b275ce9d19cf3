"""What several scenarios share: the recorder, fixtures, harness, memory sampling and the serve process.

Nothing here knows a notebook: a module in ``base`` never imports ``scenarios`` or ``reporting``.
"""
