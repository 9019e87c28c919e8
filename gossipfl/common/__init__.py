"""Small helpers every layer may use: size-limited HTTP body reads, logging, supervised loops."""
