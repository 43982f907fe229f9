"""What every service shares and no service owns: the gRPC error interceptor and the adapter name rule.
Services still meet only through protos/; this is a library each of them uses, like grpcio itself."""
