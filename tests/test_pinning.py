"""Page-locking a component's host tensors: in place where the driver accepts a range, packed into one
buffer where it refuses. The driver is replaced by recorders here (no GPU); the bookkeeping is real."""

import threading

import torch

from t2v import pinning
from t2v.engine import residency as residency_module
from t2v.models import tiny
from t2v.pinning import PAGE, pack_host_tensors, page_ranges, pin_host_tensors

IDS = torch.tensor([[5, 9, 17, 1]])


def _host_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())


def _range_of(tensor: torch.Tensor, ranges) -> list[tuple[int, int]]:
    ptr = tensor.untyped_storage().data_ptr()
    return [(a, a + n) for a, n in ranges if a <= ptr and ptr + tensor.untyped_storage().nbytes() <= a + n]


def test_page_ranges_cover_every_storage_in_whole_pages_and_never_share_a_page():
    encoder = tiny.build_text_encoder()
    tensors = _host_tensors(encoder)
    ranges = page_ranges(tensors)

    assert all(begin % PAGE == 0 and end % PAGE == 0 and begin < end for begin, end, _ in ranges)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # sorted, disjoint
    assert sorted(id(t) for _, _, members in ranges for t in members) == sorted(id(t) for t in tensors)
    for begin, end, members in ranges:
        for t in members:
            ptr = t.untyped_storage().data_ptr()
            assert begin <= ptr and ptr + t.untyped_storage().nbytes() <= end


def test_pinning_registers_in_place_packs_what_is_refused_and_release_unregisters_it():
    encoder = tiny.build_text_encoder()
    before = encoder(input_ids=IDS).last_hidden_state
    tensors = _host_tensors(encoder)
    address = {id(t): t.data_ptr() for t in tensors}
    refused_tensor = encoder.encoder.block[0].layer[0].SelfAttention.q.weight
    refused_range = _range_of(refused_tensor, [(b, e - b) for b, e, _ in page_ranges(tensors)])
    registered, unregistered, threads = [], [], set()
    lock = threading.Lock()

    def register(begin: int, nbytes: int) -> bool:
        with lock:
            threads.add(threading.current_thread().name)
            if [(begin, begin + nbytes)] == refused_range:
                return False
            registered.append((begin, nbytes))
            return True

    arenas = []

    def allocate(nbytes: int) -> torch.Tensor:
        arenas.append(torch.empty(nbytes, dtype=torch.uint8))
        return arenas[-1]

    pin = pin_host_tensors(
        encoder,
        # The tiny model's tensors are all small: taken as owning their pages, to test registering in place.
        shares_pages_below=0,
        register=register,
        unregister=unregistered.append,
        allocate=allocate,
        is_pinned=lambda t: False,
    )

    (arena,) = arenas
    start, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    packed = [t for t in _host_tensors(encoder) if start <= t.data_ptr() < end]
    assert refused_tensor in packed and pin.packed_bytes == arena.numel()
    # The rest were registered where they lie: same addresses, each inside one registered range.
    for t in _host_tensors(encoder):
        if not any(t is p for p in packed):
            assert t.data_ptr() == address[id(t)] and len(_range_of(t, registered)) == 1
    assert sorted(pin.registered) == sorted(registered) and pin.registered_bytes > pin.packed_bytes
    assert all(name.startswith("t2v-pin") for name in threads)  # never the caller's thread
    assert encoder.shared.weight is encoder.encoder.embed_tokens.weight
    assert torch.equal(encoder(input_ids=IDS).last_hidden_state, before)

    pin.release()
    assert sorted(unregistered) == sorted(a for a, _ in registered)
    assert pin.registered == [] and pin.kept == []


def test_registered_memory_stays_allocated_until_released_even_when_the_weights_move():
    # Freed while registered, an address could be reused by a new tensor that would look page-locked
    # while the driver holds the old pages: the pin keeps each registered storage alive.
    encoder = tiny.build_text_encoder()
    weight = encoder.shared.weight
    storage_ptr = weight.untyped_storage().data_ptr()
    pin = pin_host_tensors(
        encoder,
        register=lambda a, n: True,
        unregister=lambda a: None,
        is_pinned=lambda t: False,
        shares_pages_below=0,
    )
    encoder.to(torch.float64)  # swaps every parameter's data for a new storage
    assert weight.untyped_storage().data_ptr() != storage_ptr
    assert storage_ptr in {s.data_ptr() for s in pin.kept}
    pin.release()
    assert pin.kept == []


def test_tensors_already_page_locked_are_left_alone():
    encoder = tiny.build_text_encoder()
    pinned_ids = {id(encoder.shared.weight)}
    seen = []
    pin = pin_host_tensors(
        encoder,
        shares_pages_below=0,
        register=lambda a, n: seen.append((a, n)) or True,
        unregister=lambda a: None,
        is_pinned=lambda t: id(t) in pinned_ids,
    )
    assert _range_of(encoder.shared.weight, pin.registered) == []
    assert len(seen) == len(pin.registered) > 0


def test_packing_host_tensors_into_one_buffer_keeps_values_ties_and_outputs():
    encoder = tiny.build_text_encoder()
    before = encoder(input_ids=IDS).last_hidden_state
    arenas = []

    def allocate(nbytes: int) -> torch.Tensor:
        arenas.append(torch.empty(nbytes, dtype=torch.uint8))
        return arenas[-1]

    moved = pack_host_tensors(encoder, allocate)

    (arena,) = arenas
    start, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    tensors = _host_tensors(encoder)
    assert moved == arena.numel() >= sum(t.numel() * t.element_size() for t in tensors)
    assert all(
        start <= t.data_ptr() < end and (t.data_ptr() - start) % pinning.PACK_ALIGN == 0 for t in tensors
    )
    assert encoder.shared.weight is encoder.encoder.embed_tokens.weight  # still one tied Parameter
    assert torch.equal(encoder(input_ids=IDS).last_hidden_state, before)


def test_a_dropped_component_gives_its_page_locked_memory_back(monkeypatch):
    released, threads = [], []

    def unregister(address: int) -> None:
        released.append(address)
        threads.append(threading.current_thread().name)

    pin = pinning.HostPin(registered=[(0, PAGE)], unregister=unregister)
    residency = residency_module.Residency(pin=lambda module: pin)
    module = torch.nn.Linear(2, 2)
    residency.prefetch("vae", "tiny", lambda: module)
    assert residency.get("vae", "tag", lambda: residency.prefetched("vae", "tiny")) is module
    assert released == []
    residency.drop()
    residency.forget_prefetched()  # what the end of a night does: waits for memory being given back
    assert released == [0] and threads[0].startswith("t2v-prefetch")  # off the stage's thread


def test_a_prefetch_nobody_took_gives_its_page_locked_memory_back(monkeypatch):
    released = []
    pin = pinning.HostPin(registered=[(PAGE, PAGE)], unregister=released.append)
    residency = residency_module.Residency(pin=lambda module: pin)
    residency.prefetch("transformer", "tiny", lambda: torch.nn.Linear(2, 2))
    residency.forget_prefetched()
    assert released == [PAGE]


def test_tensors_that_share_one_storage_are_registered_once():
    # The VAE has such views; sorting their equal spans once compared the tensors themselves.
    module = torch.nn.Module()
    base = torch.arange(4096, dtype=torch.float32)
    module.register_buffer("first", base[:2048])
    module.register_buffer("second", base[2048:])
    module.register_buffer("alone", torch.ones(3000))
    ranges = page_ranges(_host_tensors(module))
    first_range = [members for _, _, members in ranges if any(m is module.first for m in members)]
    assert len(first_range) == 1 and any(m is module.second for m in first_range[0])
    registered = []
    pin = pin_host_tensors(
        module,
        shares_pages_below=0,
        register=lambda a, n: registered.append(a) or True,
        unregister=lambda a: None,
        is_pinned=lambda t: False,
    )
    assert len(registered) == len(set(registered)) == len(ranges) and pin.packed_bytes == 0


def test_a_pack_that_fails_leaves_nothing_registered():
    encoder = tiny.build_text_encoder()
    unregistered = []
    (refused_range,) = [
        (begin, end)
        for begin, end, members in page_ranges(_host_tensors(encoder))
        if any(m is encoder.shared.weight for m in members)
    ]

    def allocate(nbytes: int) -> torch.Tensor:
        raise MemoryError("no page-locked memory left")

    registered = []

    def register(begin: int, nbytes: int) -> bool:
        if (begin, begin + nbytes) == refused_range:
            raise RuntimeError("driver says no")  # raised, not returned: counts as refused
        registered.append(begin)
        return True

    try:
        pin_host_tensors(
            encoder,
            shares_pages_below=0,
            register=register,
            unregister=unregistered.append,
            allocate=allocate,
            is_pinned=lambda t: False,
        )
    except MemoryError:
        pass
    else:
        raise AssertionError("the failed pack should have raised")
    assert registered and sorted(unregistered) == sorted(registered)


def test_small_tensors_are_moved_to_pages_of_their_own_before_registering():
    # A heap allocation shares its first and last pages with its neighbours; registered in place, a
    # small tensor would page-lock part of theirs, and the card's copies of a tensor that lies partly in
    # registered pages fail ("invalid argument": a resident block's LoRA weights on the H200).
    neighbours, layers = [], []
    for _ in range(8):  # small tensors of the module among others on the heap
        layers.append(torch.nn.Linear(24, 24))
        neighbours.extend(torch.randn(24) for _ in range(8))
    module = torch.nn.Sequential(*layers, torch.nn.Linear(512, 512))
    big = module[-1].weight  # 1 MiB: taken as a mapping of its own here
    x = torch.randn(2, 24)
    before = module[:-1](x)
    registered = []
    pin = pin_host_tensors(
        module,
        shares_pages_below=2**20,
        register=lambda a, n: registered.append((a, n)) or True,
        unregister=lambda a: None,
        is_pinned=lambda t: False,
        mappings=lambda: [],
    )
    small = [t for layer in layers for t in layer.parameters()] + [module[-1].bias]
    (buffer,) = {t.untyped_storage().data_ptr() for t in small}  # all in one buffer
    assert buffer % PAGE == 0 and pin.copied_bytes >= sum(t.numel() * 4 for t in small)
    assert torch.equal(module[:-1](x), before)
    assert len(_range_of(big, registered)) == 1 and big.untyped_storage().nbytes() == 2**20
    for n in neighbours:  # nothing outside the module lies in a registered page
        ptr = n.untyped_storage().data_ptr()
        assert not any(a <= ptr < a + size for a, size in registered)
