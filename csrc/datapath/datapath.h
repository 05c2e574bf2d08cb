/* snapimg._datapath: the compiled copy-before-write data path.
 *
 * Shared declarations of the extension's parts:
 *   table.c    Table: an origin's block table (packed entries) + the view the
 *              Python index publishes (newest live generation, exclusions, per
 *              snapshot flags, blocks with older copies kept, live snapshots' counts)
 *   slots.c    Slots: slot allocation in the store's data area
 *   record.c   the store's record log: framing, CRC-32, appending
 *   barrier.c  Barrier: I/O shared, lifecycle changes exclusive (GIL-aware)
 *   core.c     Core: origins and store files of one engine; the block copy
 *              (FICLONERANGE, else copy_file_range, else read+write)
 *   device.c   Device: origin and snapshot operations decided in C, calling back
 *              into Python only where it must decide
 *   conn.c     the NBD transmission phase of one plain connection
 *   module.c   the module
 * The protocol between this code and Python is in docs/architecture.md.
 */
#ifndef SNAPIMG_DATAPATH_H
#define SNAPIMG_DATAPATH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

/* -- table.c: packed entries, as snapimg/engine/table.py -------------------------- */
#define GEN_SHIFT 40
#define SLOT_MASK ((UINT64_C(1) << GEN_SHIFT) - 1)
#define CHUNK_SHIFT 12
#define CHUNK (UINT64_C(1) << CHUNK_SHIFT)
#define SNAP_VALID 1u
#define SNAP_SIMPLE 2u

typedef struct {
    uint32_t gen;
    uint32_t flags;
} SnapFlags;

/* A live snapshot's preserved-block count (base: as Python last knew it; pending: what
 * C installed since) and limit (max blocks, or UINT64_MAX): under the core's log_mu. */
typedef struct {
    uint32_t gen;
    uint64_t base, pending, limit;
} SnapCount;

typedef struct {
    PyObject_HEAD
    uint64_t nblocks;
    uint64_t nchunks;
    _Atomic(_Atomic uint64_t *) *chunks; /* chunk pointers, allocated on first write */
    uint32_t *chunk_max_gen;             /* Python side only (engine lock held) */
    _Atomic uint32_t *overflow;          /* per chunk: blocks with older copies kept */
    _Atomic uint32_t newest;             /* newest live generation, 0: none */
    _Atomic uint32_t excluding;          /* live snapshots with released/private blocks */
    pthread_mutex_t snaps_mu;            /* guards snaps/nsnaps */
    SnapFlags *snaps;
    size_t nsnaps, capsnaps;
    SnapCount *counts; /* live snapshots, under the core's log_mu */
    size_t ncounts;
} Table;

extern PyTypeObject TableType;
uint64_t table_get(Table *t, uint64_t b);
int table_set_run(Table *t, uint64_t b, uint64_t first, uint64_t n); /* 0, -1: no memory */
int table_prepare_run(Table *t, uint64_t b, uint64_t n); /* chunks exist: 0, -1: no memory */
uint32_t table_snap_flags(Table *t, uint32_t gen);
int table_overflow_in(Table *t, uint64_t b0, uint64_t b1);

/* -- slots.c ----------------------------------------------------------------------- */
typedef struct {
    uint64_t start, end;
} SlotRun;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    int initialised;
    uint64_t end;  /* slots [0, end) exist */
    SlotRun *runs; /* free runs, sorted, merged */
    size_t nruns, capruns;
} Slots;

extern PyTypeObject SlotsType;
uint64_t slots_alloc(Slots *s, uint64_t n); /* the first of n consecutive slots */
int slots_free(Slots *s, uint64_t start, uint64_t count); /* 0, -1: no memory */

/* -- record.c --------------------------------------------------------------------- */
#define COPY_RECORD_SIZE 35 /* u32 length, u8 kind, <HIQIQ payload, u32 crc32 */
void encode_copy_record(char *out, uint16_t origin, uint32_t gen, uint64_t block,
                        uint32_t count, uint64_t slot);

/* -- barrier.c --------------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int shared;
    int exclusive;
    int waiting; /* exclusive waiters: they get priority over new shared holders */
} Barrier;

extern PyTypeObject BarrierType;
void barrier_acquire_shared(Barrier *b); /* no GIL needed (never called with it) */
void barrier_release_shared(Barrier *b);

/* -- core.c -------------------------------------------------------------------------- */
typedef struct {
    int fd;
    uint16_t id;  /* the origin's id in the store's records */
    uint64_t size;
    int is_block;
    _Atomic int reflink; /* 1: try FICLONERANGE into the store */
    int copy_range;      /* 0: no copy_file_range (it would clone where cloning is off) */
    int clone_dirty;     /* 1: clone runs with dirty pages too (SNAPIMG_REFLINK=always) */
    Table *table;        /* strong reference */
} COrigin;

typedef struct {
    PyObject_HEAD
    Barrier *barrier;
    uint32_t block_size;
    unsigned block_shift;
    _Atomic int closed;
    _Atomic int pending; /* the store has freed slots waiting for Python's reclaim */
    _Atomic int data_fd; /* store data file; -1: store I/O goes through Python */
    _Atomic int meta_fd;
    PyObject *sync_store; /* Python: the store sync (fault hooks, RAM store) */
    COrigin **origins;
    size_t norigins;
    _Atomic uint64_t clone_runs, copy_range_runs, rw_runs;
    /* The record log (the store's meta file) and the slot allocator, shared with Python:
     * log_mu orders every append-and-apply (Python's DataPath.log, C's installs);
     * append_mu guards the log's end while appending. */
    pthread_mutex_t log_mu, append_mu;
    uint64_t log_end, log_reserved, appended;
    Slots *slots;            /* strong reference; NULL: no C installs */
    _Atomic int fast_install; /* 1: C installs first copies itself (Python decides when) */
    _Atomic uint64_t fast_installs, slow_installs;
    pthread_mutex_t grow_mu;
    int prealloc;            /* keep data-area space allocated ahead (not under clones) */
    uint64_t data_reserved;  /* slots below this have space allocated */
    _Atomic uint64_t dirty_runs; /* runs copied, not cloned: the origin's pages were dirty */
} Core;

extern PyTypeObject CoreType;
int core_sync_store_fds(Core *c); /* 0 or errno; -1: store I/O is Python's */
/* pread until len bytes or the file's end (*got); pwrite all of it (0 written: ENOSPC).
 * Both retry EINTR and return 0 or an errno. */
int file_pread(int fd, char *buf, size_t len, uint64_t off, size_t *got);
int file_pwrite(int fd, const char *buf, size_t len, uint64_t off);
int core_copy_blocks(Core *c, COrigin *o, uint64_t b, const uint64_t *ext, size_t next);
int core_append(Core *c, const char *buf, size_t len, uint64_t *seq); /* 0 or errno */
void core_grow_data(Core *c); /* allocate data-area space ahead of the allocator's end */

/* -- device.c ------------------------------------------------------------------------ */
enum { DEV_ORIGIN = 0, DEV_SNAPSHOT = 1 };

typedef struct {
    PyObject_HEAD
    Core *core;
    COrigin *o;
    int kind;
    uint32_t gen;       /* snapshot generation */
    int read_only;
    int can_trim;
    PyObject *slow;     /* Python object: the reference data path bound to this device */
} Device;

extern PyTypeObject DeviceType;

/* The outcome of one operation: err 0 (ok) or an errno; msg for the NBD error reply.
 * In "raise" mode (a Python caller) a Python exception may be kept in exc instead. */
typedef struct {
    PyThreadState *ts; /* this thread's state while the GIL is released */
    PyGILState_STATE gstate;
    int own_ts;        /* ts was made for this (C) thread on its first callback */
    int raise;         /* 1: keep Python exceptions for the caller */
    PyObject *describe; /* NBD: exception -> (errno, message) */
    void (*on_block)(void *); /* called once before the operation may block (conn.c) */
    void *on_block_arg;
    int err;
    char msg[256];
    PyObject *exc_type, *exc_value, *exc_tb;
    int exc_class;     /* the snapimg error class a Python caller gets: EXC_* */
} OpCtx;

enum { EXC_OS = 0, EXC_DEVICE, EXC_RANGE, EXC_READ_ONLY };

/* Before a Python callback or an fdatasync: tell the caller, once (device.c). */
void may_block(OpCtx *ctx);

/* Operations (GIL released; ctx->ts restores it for callbacks).  Return 0 or -1
 * (ctx holds the error).  Reads fill buf (length bytes). */
int dev_read(Device *d, OpCtx *ctx, uint64_t off, uint32_t len, char *buf);
int dev_write(Device *d, OpCtx *ctx, uint64_t off, uint32_t len, const char *buf, int fua);
int dev_zero(Device *d, OpCtx *ctx, uint64_t off, uint64_t len, int fua, int punch);
int dev_trim(Device *d, OpCtx *ctx, uint64_t off, uint64_t len);
int dev_flush(Device *d, OpCtx *ctx);

typedef struct {
    uint64_t length;
    uint32_t state; /* NBD_STATE_HOLE | NBD_STATE_ZERO */
} CExtent;
/* Extents covering at least the first byte of the range, at most max of them. */
int dev_block_status(Device *d, OpCtx *ctx, uint64_t off, uint64_t len, CExtent *out,
                     size_t max, size_t *n);

/* -- conn.c -------------------------------------------------------------------------- */
PyObject *device_serve(Device *d, PyObject *args, PyObject *kwds);

/* -- module.c: Python objects the C code uses ---------------------------------------- */
extern PyObject *ArrayType;      /* array.array */
extern PyObject *ErrDevice;      /* snapimg.errors.DeviceError */
extern PyObject *ErrOutOfRange;  /* snapimg.errors.OutOfRangeError */
extern PyObject *ErrReadOnly;    /* snapimg.errors.ReadOnlyError */
extern PyObject *ExtentType;     /* snapimg.blockdev.Extent */
int nbd_error(int err);          /* a host errno as an NBD error value (conn.c) */

#endif
