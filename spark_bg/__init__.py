"""spark_bg: background jobs for Starlette, run by a separate worker process.

A handler pushes a job with `request.app.state.queue.push(job)`; the user gets the response at
once; `spark-worker` runs the job from Redis or an embedded SQLite file.
"""

from spark_bg.errors import (
    BackendError,
    CancelJob,
    ConfigurationError,
    JobLoadError,
    JobStateError,
    RetryJob,
    SparkError,
)
from spark_bg.job import Job, JobContext, current_job
from spark_bg.middleware import QueueMiddleware
from spark_bg.queue import Queue, current_queue

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CancelJob",
    "ConfigurationError",
    "Job",
    "JobContext",
    "JobLoadError",
    "JobStateError",
    "Queue",
    "QueueMiddleware",
    "RetryJob",
    "SparkError",
    "current_job",
    "current_queue",
]
