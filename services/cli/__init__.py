"""`iex`: a thin command-line client of the services' gRPC APIs."""
