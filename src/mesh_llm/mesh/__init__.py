"""The mesh: identity, invite tokens, QUIC transport, gossip membership and tunnels."""
