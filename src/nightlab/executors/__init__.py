"""Where experiments run when not in the harness's own process tree (``--executor``).

The local executor is the engine's own ``sandbox.run`` + ``measure``. Others live in their own
modules and import their optional dependency lazily: ``ray_executor`` (``nightlab[ray]``).
"""
