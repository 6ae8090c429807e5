"""Surviving crashes and hangs (issue 13), daemon side; never imports torch.

- :mod:`.hang`: the stacks of a hung trainer, into the log;
- :mod:`.restarts`: ``run --restarts N``: restart a crashed, hung or OOM-killed command, with
  backoff and a no-progress guard;
- :mod:`.snapshots`: persist the trainer's newest shared-memory snapshot as a checkpoint after
  it died without saving;
- :mod:`.output`: the wrapped command's stderr, passed through unchanged, its traceback kept for
  the failure message and the crash event (issue 15).
"""
