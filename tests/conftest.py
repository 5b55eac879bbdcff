"""Settings for every test session.

The embedded FnApiRunner's state cache weighs every cached state value with
objsize, which walks the globals of every loaded module on each call: a few
milliseconds per stateful access, minutes for a stateful test. Runs switch
the cache off the same way (``txstream.runners.profiles.runner_for``).
"""
from apache_beam.runners.portability.fn_api_runner import worker_handlers

worker_handlers.STATE_CACHE_SIZE_MB = 0
