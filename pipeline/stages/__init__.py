"""The steps of the email_digest workflow: parse, ingest, digest, deliver. Each is plain functions."""
