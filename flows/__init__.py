"""Prefect flows and the `pipeline` command line. The only package that imports prefect."""
