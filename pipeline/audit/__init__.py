"""The measuring half: fixtures, recorder, scenarios and report. Imports ``pipeline``; never the reverse.

Each notebook's measuring code lives in one module of ``scenarios/`` named after it; the views that draw its
rows live in ``reporting/``; ``base/`` holds what several scenarios share. ``batch`` runs the notebooks
(papermill) per profile, and ``notebook`` holds the helpers they call.

=======================  ==============================================  ===================================
notebook                 scenario module (``scenarios/``)                report views (``reporting/``)
=======================  ==============================================  ===================================
01_pipeline_profile      pipeline_profile, line_profile, end_to_end      profileviews, views
02_pdf_ingestion         pdf_ingestion                                   views
03_concurrency_stress    concurrency                                     views
04_email_bursts          email_bursts, client_latency                    soakviews, views
05_memory_soak           memory_soak                                     soakviews, views
06_store_queries         store_queries                                   views
07_code_quality          code_quality                                    views
08_optimizations         optimizations, gateway_bench, lock_wait         views
09_faults                faults                                          views
10_hostile_senders       hostile_senders, hostile_checks                 hostileviews
11_scale_out             scale_out                                       scaleoutviews
12_monitoring            monitoring                                      alertbaselines, views
13_regression_gate       regression_gate                                 views (abcommits, regression)
14_peers                 peers, peer_shapes (peer_bench: a script)       peerviews
99_audit_report          (measures nothing)                              report and every view above
=======================  ==============================================  ===================================

``peer_bench`` is no module of the package at run time: ``peers`` runs it as a script with each peer engine's own
interpreter (``data/peers/<name>/venv``, made by ``make peers``: ``base.peerenv``), so it imports only the
standard library and that engine.

One scenario module has no notebook: ``cli_start`` (the CLI's start-up; ``tests/test_cli_startup.py`` checks
its import budget and the module times the commands when run by hand).

``base/``: recorder (DuckDB), fixtures (PDFs and mails), harness (in-process pipeline, rows, ``save``),
memory, paths, serveproc (a real ``python -m pipeline serve``), smtpclients (the sender processes' light
module), servemem, workerrss, faultcheck, pgserver, realpdfs, baresink (the bare SMTP sink under the
sender's wait), peerenv (the peer engines' venvs).
A module in ``base/`` never imports ``scenarios/`` or ``reporting/``; ``reporting/`` reads what the
scenarios recorded and measures nothing.
"""
