"""The training base the stages share: mesh, jitted step, loop, checkpoints, processes."""
