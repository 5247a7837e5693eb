"""Mock LMCache controller: the LMCache 0.5.6 controller's HTTP API and worker protocol, in memory."""
