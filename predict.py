"""A trained model's answers to raw files: ``python predict.py run_id=<id> input=<file or
folder> [output=<folder>]`` (or ``ckpt_path=<file>``, ``model_uri=models:/<name>/<version>``);
see conf/predict.yaml for what each family reads and writes."""

import sys
from pathlib import Path

import hydra

import zoo.config  # noqa: F401  (registers the config resolvers)
from zoo.cli import check_group_choices, exit_cleanly_on_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
@exit_cleanly_on_user_errors
def main(cfg):
    from zoo.pipeline import predict  # torch, Lightning, mlflow: only once the config is checked

    predict(cfg)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], Path(__file__).resolve().parent / "conf")
    main()
