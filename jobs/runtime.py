"""How a command talks to a person, decided in one place: quiet by default, `--verbose` for everything.

Quiet: each stage prints its own progress and summary lines (the `pipeline` and `jobs` loggers at INFO,
one short line each); the engine's logs stay in Ray's session directory, through Ray's own switches:
`log_to_driver=False` (worker and actor output: Ray Train's reports, actor warnings), Ray's
`logging_level` / `LoggingConfig` (driver and worker loggers) and Ray Data's logging config
(`RAY_DATA_LOGGING_CONFIG`: the operator dumps go to ray-data.log only). Errors still reach the terminal:
a failing command prints its cause, and anything at WARNING or above from our code is printed.

Verbose: Ray's defaults, plus our lines with their logger names.
"""

from __future__ import annotations

import logging
import os
import sys

RAY_DATA_LOGGING_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray-data-logging.yaml")
OUR_LOGGERS = ("pipeline", "jobs")


def configure_output(verbose: bool = False) -> None:
    """Call before Ray (or Ray Data) is imported: Ray Data reads its logging config on import."""
    if not verbose:
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING_CONFIG)
    handler = logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s" if verbose else "%(asctime)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def init_ray(verbose: bool = False) -> str | None:
    """Start local Ray, or connect to the cluster named by RAY_ADDRESS; returns where Ray's logs are
    (None when this process did not start Ray: a caller that did owns its settings)."""
    import ray

    if ray.is_initialized():
        return None
    level = logging.INFO if verbose else logging.WARNING
    ray.init(
        log_to_driver=verbose,
        logging_level=level,
        logging_config=ray.LoggingConfig(log_level=logging.getLevelName(level)),
    )
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:  # off on purpose (our own progress lines): Ray's once-per-process notice is marked as given
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")
    return ray_log_dir()


def ray_log_dir() -> str | None:
    """The logs folder of this process's Ray session (on a cluster: the head node's), read the way Ray
    Data's own `get_log_directory` reads it; None when Ray is not started."""
    from ray._private.worker import _global_node

    return None if _global_node is None else os.path.join(_global_node.get_session_dir_path(), "logs")
