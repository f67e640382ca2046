"""Studies: several experiments run together, with one summary (table, figures, a summary run
in mlflow). Each is a ``python -m zoo.studies.<name>`` command that drives ``train.py``
multiruns, so every job is an ordinary zoo run in mlflow."""
