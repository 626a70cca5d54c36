"""moebench entry point: `python run.py [group=option ...] [key=value ...]`, `-m` to sweep."""

import hydra
from omegaconf import DictConfig

from moebench.app import hydra_main
from moebench.cli import precheck


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_main(cfg)


if __name__ == "__main__":
    precheck()
    main()
