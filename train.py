"""Train a zoo model: ``python train.py [experiment=<name>] [hydra overrides]``."""

import sys
from pathlib import Path

import hydra

import zoo.config  # noqa: F401  (registers the config resolvers)
from zoo.cli import check_group_choices, exit_cleanly_on_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_cleanly_on_user_errors
def main(cfg):
    from zoo.pipeline import train  # torch, Lightning, mlflow: only once the config is checked

    return train(cfg)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], Path(__file__).resolve().parent / "conf")
    main()
