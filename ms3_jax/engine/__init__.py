"""The training base the stages share: mesh and jitted step, loop, checkpoints, processes, failure handling."""
