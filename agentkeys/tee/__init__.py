"""The TEE worker: a platform interface (seal, unseal, attest) and no database."""
