"""Node identity and signatures: one Ed25519 key per node, which is also its libp2p peer ID.

Knows nothing of the network, torch or hivemind (see `intellect.protocol` for why hivemind must stay out).
"""
