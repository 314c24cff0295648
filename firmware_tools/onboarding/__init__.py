"""Fleet onboarding: the certificate authority, provisioning, device bundles, flashing a root filesystem."""
