"""The broker's internals: the database and its stores, sign-in, sessions' keys, wallets, OIDC
minting, mail, limits, the dev signer and the app factory that wires them to the blueprints."""
