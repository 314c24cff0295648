"""What every mqvox program shares besides the protocol: the MQTT link, backoff, logging, the database base, the
state folders, the Opus codec and reading recordings. See common/README.md."""
