"""gunicorn settings for bench.profile: the Procfile's (config/gunicorn.conf.py), plus a CPU
sampler in each worker that SIGUSR2 turns on and off (bench/sampler.py). Bench only."""

from pathlib import Path

from bench.sampler import install

_PROCFILE_CONFIG = Path(__file__).resolve().parent.parent / "config" / "gunicorn.conf.py"
exec(compile(_PROCFILE_CONFIG.read_text(), str(_PROCFILE_CONFIG), "exec"))  # noqa: S102


def post_worker_init(worker: object) -> None:
    install()
