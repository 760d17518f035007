"""Profiler samples summarised by stage: parse, auth, policy, crypto, database, serialisation,
framework. Pure: stacks in, a table out.

A sample's stack is read from the innermost frame outwards; the first frame that a rule names
decides, and frames no rule names (the standard library: json, logging, datetime…) or that a
rule passes (gevent, PyJWT's own code) leave the decision to their caller, so json.loads counts
as parse under the body parser and as auth under the session check, and a gevent socket wait as
database under psycopg; a stack that nothing decides (gevent's hub) is framework. A C call is
sampled in the Python frame that made it, so coincurve's signing counts in coincurve (crypto)
and sqlite3's execute in SQLAlchemy (database).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

PARSE, AUTH, POLICY, CRYPTO = "parse", "auth", "policy", "crypto"
DATABASE, SERIALISATION, FRAMEWORK = "database", "serialisation", "framework"
STAGES = (PARSE, AUTH, POLICY, CRYPTO, DATABASE, SERIALISATION, FRAMEWORK)
PROFILER = "profiler"  # the sampler's own frames: its overhead, inside the measured CPU
ROWS = (*STAGES, PROFILER)
PASS = None  # a frame that lets its caller decide

Frame = tuple[str, str]  # (path below its root, function name)

# (path prefix, function or None for any, stage or PASS): the first match wins, so a rule for
# one function comes before the rule for its file.
RULES: tuple[tuple[str, str | None, str | None], ...] = (
    ("bench/sampler.py", None, PROFILER),
    # parse: the request body, its fields and their formats
    ("agentkeys/blueprints/parsing.py", "bearer_token", AUTH),
    ("agentkeys/blueprints/parsing.py", None, PARSE),
    ("agentkeys/signer.py", "parse_anchor", PARSE),
    ("agentkeys/signer.py", "parse_message_hex", PARSE),
    ("marshmallow/", None, PARSE),
    # auth: the bearer session: signature (cached), claims, key, generation (database)
    ("agentkeys/sessions.py", "mint", SERIALISATION),
    ("agentkeys/sessions.py", None, AUTH),
    ("agentkeys/blueprints/http.py", "bearer_session", AUTH),
    # policy: what may be signed or started: SIWE, the account binding, the abuse limits
    ("agentkeys/blueprints/http.py", "rate_limit", POLICY),
    ("agentkeys/blueprints/http.py", "client_ip", POLICY),
    ("agentkeys/blueprints/signer.py", "own_anchor", POLICY),
    ("agentkeys/signer.py", None, POLICY),
    ("agentkeys/siwe.py", None, POLICY),
    ("agentkeys/broker/wallet.py", None, POLICY),
    ("agentkeys/broker/ratelimit.py", "incr", DATABASE),
    ("agentkeys/broker/ratelimit.py", None, POLICY),
    # crypto: secp256k1, keccak, HKDF, ES256
    ("agentkeys/crypto.py", None, CRYPTO),
    ("coincurve/", None, CRYPTO),
    ("cryptography/", None, CRYPTO),
    ("ecdsa/", None, CRYPTO),
    ("jwt/algorithms.py", None, CRYPTO),
    ("jwt/", None, PASS),
    # database: queries, the pool, the driver
    ("agentkeys/broker/store.py", None, DATABASE),
    ("agentkeys/broker/db.py", None, DATABASE),
    ("sqlalchemy/", None, DATABASE),
    ("psycopg/", None, DATABASE),
    ("psycopg_binary/", None, DATABASE),
    ("psycopg_pool/", None, DATABASE),
    ("sqlite3/", None, DATABASE),
    ("redis/", None, DATABASE),
    # serialisation: the answer: tokens minted into it, times, JSON
    ("agentkeys/broker/oidc.py", None, SERIALISATION),
    ("agentkeys/timefmt.py", None, SERIALISATION),
    ("flask/json/", None, SERIALISATION),
    # framework: Flask, werkzeug, gunicorn, and the app's hooks and error handlers
    ("agentkeys/broker/keys.py", None, PASS),
    ("agentkeys/identity.py", None, PASS),
    ("agentkeys/blueprints/http.py", None, FRAMEWORK),
    ("agentkeys/blueprints/problems.py", None, FRAMEWORK),
    ("agentkeys/blueprints/metrics.py", None, FRAMEWORK),  # request ids, metrics: app hooks
    ("agentkeys/requestid.py", None, FRAMEWORK),
    ("agentkeys/observability.py", None, FRAMEWORK),
    ("prometheus_client/", None, FRAMEWORK),
    ("agentkeys/broker/factory.py", None, FRAMEWORK),
    ("agentkeys/blueprints/", None, SERIALISATION),  # a view's own lines build its answer
    ("flask/", None, FRAMEWORK),
    ("werkzeug/", None, FRAMEWORK),
    ("gunicorn/", None, FRAMEWORK),
    # gevent's waits and locks count for whoever waits: psycopg's socket waits are database
    ("gevent/", None, PASS),
    ("greenlet/", None, PASS),
)


def frame_stage(frame: Frame) -> str | None:
    """The stage a frame decides, or None when it lets its caller decide."""
    path, function = frame
    for prefix, name, stage in RULES:
        if path.startswith(prefix) and (name is None or name == function):
            return stage
    return PASS


def stage_of(stack: Sequence[Frame]) -> str:
    """The stage of one sample; `stack` is innermost frame first. Nothing named: framework."""
    for frame in stack:
        stage = frame_stage(frame)
        if stage is not None:
            return stage
    return FRAMEWORK


def tally(samples: Iterable[tuple[int, Sequence[Frame]]]) -> Counter[str]:
    """Samples per stage, the profiler's own under PROFILER."""
    found: Counter[str] = Counter()
    for count, stack in samples:
        found[stage_of(stack)] += count
    return found


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    """Each stage's share of all the samples (the profiler's own under PROFILER)."""
    total = sum(counts.values())
    return {stage: (counts.get(stage, 0) / total if total else 0.0) for stage in ROWS}


def cost_table(columns: Mapping[str, tuple[Mapping[str, int], float]]) -> list[str]:
    """A Markdown table: per stage, µs of server CPU per request for each column (its name:
    its sample counts and its measured CPU µs per request), the share in brackets; the last
    stage row is the sampler's own cost, inside the measured total."""
    names = list(columns)
    lines = [
        "| stage | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    split = {name: shares(counts) for name, (counts, _) in columns.items()}
    for stage in ROWS:
        cells = [
            f"{split[name][stage] * cpu:,.0f} ({split[name][stage]:.0%})"
            for name, (_, cpu) in columns.items()
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    totals = [f"**{cpu:,.0f}**" for _, cpu in columns.values()]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    samples = [f"{sum(counts.values()):,}" for counts, _ in columns.values()]
    lines.append("| samples | " + " | ".join(samples) + " |")
    return lines


def top_frames(samples: Iterable[tuple[int, Sequence[Frame]]], n: int = 8) -> list[str]:
    """The innermost frames with the most samples, with the stage each sample went to."""
    found: Counter[tuple[str, str, str]] = Counter()
    for count, stack in samples:
        if stack:
            path, function = stack[0]
            found[(path, function, stage_of(stack))] += count
    total = sum(found.values()) or 1
    return [
        f"{count / total:6.1%}  {path}:{function}  ({stage})"
        for (path, function, stage), count in found.most_common(n)
    ]
