"""The ``adabudget`` console script: ``train``, ``bench``, ``data`` (``search``,
``dashboard``, ``table`` come with the search and analysis releases)."""

from __future__ import annotations

import sys

USAGE = """usage: adabudget <command> [args]

commands:
  train [key=value ...]   train one configuration (Hydra overrides; -m sweeps)
  bench step [options]    per-step time/memory of LoRA vs AdaLoRA (ours and peft's)
  data [key=value ...]    fetch and describe the configured task (data=mr, data.task=...)

examples:
  adabudget train                                  # AdaLoRA on packaged MiniLM + movie reviews
  adabudget train method=lora method.r=8 train.lr=5e-4
  adabudget train model=bert-base-uncased data=glue_sst2 method.target_r=2
  adabudget train -m method.score=adalora,sensitivity,magnitude
  adabudget train resume=runs/default/2026-11-22_12-00-00
"""


def _train_app() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from budget.compose import config_dir, register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
    def app(cfg) -> None:
        from budget.config import ConfigError
        from budget.train import summary, train

        if cfg.run_dir is None and cfg.resume is None:
            cfg.run_dir = HydraConfig.get().runtime.output_dir
        try:
            result = train(cfg)
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            sys.exit(2)
        print(summary(result))
        if result["status"] == "failed":
            sys.exit(1)

    app()


def _data(args: list[str]) -> None:
    from budget.compose import compose
    from budget.config import ConfigError, resolve
    from budget.data import describe

    try:
        print(describe(resolve(compose(args)).data))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        sys.argv = [f"{sys.argv[0]} train", *rest]
        _train_app()
    elif command == "bench":
        from budget.bench import main as bench_main

        bench_main(rest)
    elif command == "data":
        _data(rest)
    else:
        print(f"unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
