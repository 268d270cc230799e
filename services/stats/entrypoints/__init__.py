"""How the outside reaches the stats service: the gRPC servicer."""
