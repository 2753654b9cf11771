"""`python -m spark_bg` runs the worker, as `spark-worker` does."""

from spark_bg.cli import main

main(prog_name="spark-worker")
