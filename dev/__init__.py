"""The lab: dev/LOG.md (the dated diary) and dev/experiments/ (one-off harnesses). Never imported by
the product."""
