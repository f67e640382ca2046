"""Evaluate a trained run and write a report: ``python evaluate.py run_id=<mlflow run id>``,
``python evaluate.py ckpt_path=<file> experiment=<name>``, ``python evaluate.py
model_uri=models:/<name>/<version>``, or ``python evaluate.py 'run_ids=[<id1>,<id2>]'`` for a
comparison."""

import sys
from pathlib import Path

import hydra

import zoo.config  # noqa: F401  (registers the config resolvers)
from zoo.cli import check_group_choices, exit_cleanly_on_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_cleanly_on_user_errors
def main(cfg):
    from zoo.pipeline import evaluate  # torch, Lightning, mlflow: only once the config is checked

    evaluate(cfg)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], Path(__file__).resolve().parent / "conf")
    main()
