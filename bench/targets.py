"""Every figure the benchmark compares a measurement against, in one place.

The performance targets the project set itself; the step criteria decide whether the daemon
keeps up with a load in the end-to-end part; the sensor figures define what "one sensor" offers.
"""

# One sensor: ECG at 250 Hz, scored in windows of 140 samples (the default model's window and stride).
SAMPLE_RATE_HZ = 250.0
WINDOW_SAMPLES = 140
SENSOR_WINDOWS_PER_SECOND = SAMPLE_RATE_HZ / WINDOW_SAMPLES

# The performance targets.
ENGINE_FRACTION_OF_LIMIT = 0.85  # the engine at the default model against the dense-matmul limit
ENGINE_OVER_TUTORIAL = {128: 3.0, 64: 4.0}  # embedding size -> factor over the tutorial loop
E2E_FRACTION_OF_ENGINE = 0.90  # windows/s through the broker against the engine alone at the same batch
LATENCY_MARGIN_SECONDS = 0.05  # p99 decision latency <= max_wait + this, below saturation
BEAT_LATENCY_LIMIT_SECONDS = 1.0  # beat mode: p99 from a beat's last sample to its decision
BEAT_WARMUP_SECONDS = 15.0  # beat mode: 2 s of detector learning and 8 beats of template warm-up before measuring
SENSORS_GOAL = 500  # 250 Hz sensors one machine carries
TRAINING_MINUTES = 5.0  # the default model's whole recipe, on 2 cores

# A step of the end-to-end part keeps up when all of these hold (and the p99 latency target above).
SCORED_FRACTION_OF_OFFERED = 0.95
GENERATOR_ON_TIME_FRACTION = 0.97  # the load generator published at least this share of its schedule
