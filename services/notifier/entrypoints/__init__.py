"""How the world reaches the notifier: the gRPC API and the notifications stream."""
