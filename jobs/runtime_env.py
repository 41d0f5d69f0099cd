"""python -m jobs.runtime_env: the runtime environment for ``ray job submit``, as JSON.

    ray job submit --address http://127.0.0.1:8265 \\
        --runtime-env-json "$(python -m jobs.runtime_env)" -- python -m jobs.tune ...

It is jobs/runtime_env.yaml plus this checkout's git revision: the working_dir Ray ships leaves
.git behind, so the job could not read it there, and every result records it as provenance.
"""

from __future__ import annotations

import sys

from resnet.errors import OneLineParser, run_main


def build_parser() -> OneLineParser:
    return OneLineParser(prog="python -m jobs.runtime_env",
                         description="Print the runtime environment for `ray job submit "
                                     "--runtime-env-json`: jobs/runtime_env.yaml plus "
                                     "RESNET_GIT_REVISION, this checkout's git revision.")


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)

    def run() -> int:
        from resnet.infra.provenance import submit_runtime_env
        print(submit_runtime_env())
        return 0

    return run_main("jobs.runtime_env", run)


if __name__ == "__main__":
    sys.exit(main())
