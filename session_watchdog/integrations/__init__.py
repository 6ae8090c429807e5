"""Framework integrations of the trainer side; each module imports its framework, nothing here does.

- ``session_watchdog.integrations.hf``: ``WatchdogCallback`` for ``transformers.Trainer`` and
  ``watchdog_resume(output_dir)`` (``pip install 'session-watchdog[hf]'``);
- ``session_watchdog.integrations.lightning``: ``WatchdogCallback`` for Lightning 2.x and
  ``watchdog_resume(dirpath)`` (``pip install 'session-watchdog[lightning]'``);
- ``session_watchdog.integrations.accelerate``: ``AcceleratorSession``, a Session that saves with
  ``accelerator.save_state``.

All three checkpoint into directories committed by a marker written last (``_core``).
"""
