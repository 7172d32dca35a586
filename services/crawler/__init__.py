"""The crawler: consumes queries, searches, downloads images safely, stages bytes in S3, publishes fetched images."""
