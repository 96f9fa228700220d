"""Data: schema, metadata, image decoding, TFRecords, tf.data, synthetic films."""
