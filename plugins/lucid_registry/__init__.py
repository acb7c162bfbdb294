"""Lucid's service registry plugin: registration, discovery, health, watches, persistence."""

LUCID_CAPABILITY = "registry"


class RegistryPlugin:
    """One instance per gateway (Lucid instantiates the class named by the entry point)."""

    LUCID_CAPABILITY = LUCID_CAPABILITY
