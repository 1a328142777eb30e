"""The HTTP cache: pure policy (RFC 9111), keys, and the on-disk store."""
