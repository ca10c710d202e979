"""The exit codes of `python -m ms3_jax.main`, the same on every process of a job, from start to
exit (launchers and schedulers act on them: `launch/`)."""

DONE = 0
ERROR = 1  # a bug, a non-finite loss, a process of the job missing, dead or failed
USAGE = 2  # what the user can fix: a config value, a path, the data, a workdir in use
PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: SIGTERM / SIGINT; relaunch the same command to resume
