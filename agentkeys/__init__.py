"""AgentKeys: identity and signing backend. `create_app` is the Flask application factory.

The factory is imported lazily so that pure modules (`python -m agentkeys.siwe`, the daemon)
never pull in Flask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(*args: Any, **kwargs: Any) -> Flask:
    from agentkeys.broker.factory import create_app as factory

    return factory(*args, **kwargs)
