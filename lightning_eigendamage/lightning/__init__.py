"""The Lightning glue: :class:`~.callback.EigenDamagePruning` and its schedule
(:class:`~.schedule.PruningSchedule`). The only package that imports Lightning."""
