"""The cache service's wire format and the client stub the stream and registry call."""
