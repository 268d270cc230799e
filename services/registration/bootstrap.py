"""The registration service, declared: the front door. It publishes each accepted
sign-up on `registrations` (batched PutRecords) and keeps a cache of the catalogue; it
has no database and consumes no stream with leases: it only tails `enrollment-events`
read-only to wake its open watches. The runtime (libs.worker) does the rest."""

from __future__ import annotations

import logging
import os

from coursesignup.enrollment.v1 import enrollment_pb2_grpc
from coursesignup.registration.v1 import registration_pb2_grpc
from libs import grpc_client
from libs.grpc_server import ServiceHooks, run_service
from libs.kinesis import ENROLLMENT_EVENTS_STREAM, REGISTRATIONS_STREAM, RecordBatcher
from libs.metrics import multiprocess_dir
from libs.worker import Runtime, Service, Servicer
from services.registration.adapters.catalogue import Catalogue
from services.registration.domain.registration_ids import RegistrationIds
from services.registration.entrypoints.grpc_api import ADMIN_METHODS, SERVICE_NAME, RegistrationServicer
from services.registration.service_layer.watches import WatchHub
from services.registration.settings import RegistrationSettings

log = logging.getLogger(__name__)


def service(settings: RegistrationSettings, *, worker: int | None = None) -> Service[RegistrationSettings]:
    """`worker` is this process's index when it is one of several sharing the port."""

    def servicers(runtime: Runtime[RegistrationSettings]) -> list[Servicer]:
        channel = grpc_client.aio_channel(settings.enrollment_target, settings)
        catalogue = Catalogue(channel)
        commands = RecordBatcher(runtime.kinesis, runtime.stream_name(REGISTRATIONS_STREAM),
                                 max_wait_seconds=settings.register_batch_millis / 1000,
                                 max_in_flight=settings.register_max_in_flight)
        watches = WatchHub()
        servicer = RegistrationServicer(
            RegistrationIds(settings.registration_id_secret),
            catalogue,
            enrollment_pb2_grpc.EnrollmentServiceStub(channel),
            commands,
            max_pending=settings.register_max_pending,
            retry_delay_seconds=settings.register_retry_delay_millis / 1000,
            internationalized_mailboxes=settings.register_internationalized_mailboxes,
            watches=watches,
        )

        async def stop() -> None:
            log.info("registration worker stopped", extra={
                "worker": worker, "pid": os.getpid(), "register_accepted": servicer.accepted,
                "register_refused_overload": servicer.shed, "put_records_calls": commands.batches_sent,
                "records_per_put": round(commands.records_sent / max(commands.batches_sent, 1), 1)})
            await commands.close()
            await catalogue.close()
            await channel.close()

        runtime.on_start(catalogue.start)
        runtime.dependency("enrollment", catalogue.reachable)
        runtime.on_start(commands.start)
        # WatchRegistration: every process follows the enrollment events itself (no leases).
        runtime.tail(ENROLLMENT_EVENTS_STREAM, watches.on_events)
        runtime.on_stop(stop)
        return [Servicer(registration_pb2_grpc.add_RegistrationServiceServicer_to_server, servicer, SERVICE_NAME,
                         ADMIN_METHODS)]

    return Service(
        name="registration",
        settings=settings,
        port=settings.registration_port,
        servicers=servicers,
        publishes=[REGISTRATIONS_STREAM],
        kinesis_connections=32,
        reuse_port=worker is not None,
        # Workers of several write prometheus_client's multiprocess files; their parent serves the sum.
        metrics_port=0 if multiprocess_dir() else settings.registration_metrics_port,
    )


def build_hooks(settings: RegistrationSettings, *, worker: int | None = None) -> ServiceHooks:
    return service(settings, worker=worker).hooks()


def serve_worker(settings: RegistrationSettings, worker: int | None = None) -> None:
    """Serves in this process (alone, or as worker `worker` of several) until SIGTERM."""
    run_service("registration", settings, lambda s: build_hooks(s, worker=worker))
