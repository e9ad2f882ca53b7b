"""The batch job: checks, plan, stream, sinks, manifests, fingerprint, locks."""
