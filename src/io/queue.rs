//! A bounded queue between threads that sleeps when it must wait, never spins: a lock,
//! two condition variables, and counts of the ends. (crossbeam's channels spin and
//! yield the CPU a few times in every blocking receive before they sleep: on a run's
//! busiest channel, hundreds of `sched_yield` calls that take a core from the thread
//! being waited for.) Used where one side waits on the other all run long.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receiver: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled when an item arrives or the last sender goes.
    filled: Condvar,
    /// Signalled when an item is taken or the receiver goes.
    emptied: Condvar,
    cap: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending end; cloned for each sender.
pub struct Sender<T>(Arc<Shared<T>>);

/// The receiving end.
pub struct Receiver<T>(Arc<Shared<T>>);

/// A queue holding at most `cap` items (at least 1).
pub fn bounded<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::with_capacity(cap.max(1)),
            senders: 1,
            receiver: true,
        }),
        filled: Condvar::new(),
        emptied: Condvar::new(),
        cap: cap.max(1),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queues `item`, waiting while the queue is full; `Err(item)` once the receiver is
    /// gone.
    pub fn send(&self, item: T) -> Result<(), T> {
        let s = &*self.0;
        let mut st = s.lock();
        while st.receiver && st.items.len() >= s.cap {
            st = s.emptied.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if !st.receiver {
            return Err(item);
        }
        st.items.push_back(item);
        drop(st);
        s.filled.notify_one();
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut st = self.0.lock();
            st.senders -= 1;
            st.senders == 0
        };
        if last {
            self.0.filled.notify_all();
        }
    }
}

/// Every sender is gone and the queue is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnected;

impl<T> Receiver<T> {
    /// The next item, waiting for one; `Err` once the queue is empty and every sender
    /// is gone.
    pub fn recv(&self) -> Result<T, Disconnected> {
        let s = &*self.0;
        let mut st = s.lock();
        loop {
            if let Some(item) = st.items.pop_front() {
                drop(st);
                s.emptied.notify_one();
                return Ok(item);
            }
            if st.senders == 0 {
                return Err(Disconnected);
            }
            st = s.filled.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Queued items go with it; waiting senders are told.
        let items = {
            let mut st = self.0.lock();
            st.receiver = false;
            std::mem::take(&mut st.items)
        };
        drop(items);
        self.0.emptied.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_arrive_in_order_and_the_end_is_told() {
        let (tx, rx) = bounded(2);
        let tx2 = tx.clone();
        let t = std::thread::spawn(move || {
            for i in 0..100 {
                tx.send(i).unwrap();
            }
        });
        let got: Vec<i32> = (0..100).map(|_| rx.recv().unwrap()).collect();
        t.join().unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        drop(tx2);
        assert_eq!(rx.recv(), Err(Disconnected));
    }

    #[test]
    fn a_full_queue_lets_its_sender_go_when_the_receiver_does() {
        let (tx, rx) = bounded(1);
        tx.send(1).unwrap();
        let t = std::thread::spawn(move || tx.send(2));
        // Whether the sender is waiting yet or not, it must end with its item back.
        drop(rx);
        assert_eq!(t.join().unwrap(), Err(2));
    }
}
