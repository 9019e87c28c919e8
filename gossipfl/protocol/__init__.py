"""What travels between nodes and how two models become one: the wire codec, merge rules, consensus
maths, and the two-phase exchange (initiator and responder). Knows nothing of discovery, HTTP routes or
the node; the peer table and the model come in through the small interfaces in ``ports``."""
