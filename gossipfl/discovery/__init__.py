"""Who a node can talk to: the peer table, mDNS, DNS, seeds, peer exchange, probing, replica ordinals.
Never trains or merges."""
