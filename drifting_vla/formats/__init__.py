"""The bottom layer: what lies on disk and what a config may say, known to every other package
and knowing none of them. Files written atomically, locked and hashed (files.py); the schema of
every config group, the single place its keys, defaults and rules are declared (config.py), the
rule a setting carries and the walk that enforces it (settings.py), and the checks a program runs
on its config when it starts (validation.py); checkpoint step directories and their markers
(checkpoint.py); weights on disk and the frozen encoders they reference (weights.py); the
saved-policy layout that exports and checkpoints share (export.py)."""
