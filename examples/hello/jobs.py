"""The job of the hello example."""

import os
import time

import spark_bg


class HelloWorldJob(spark_bg.Job):
    """Greet someone, after some slow work."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self) -> None:
        # Stands in for expensive work; HELLO_SLEEP_S shortens it for a demo.
        time.sleep(float(os.environ.get("HELLO_SLEEP_S", "20")))
        print(f"Hello World {self.name}!", flush=True)
